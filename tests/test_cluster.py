"""Cluster deployment files (cluster/, docs/cluster.md): valid for Ray, KubeRay and the project.

Offline and fast: Ray's own cluster-config validation (no cloud calls), YAML parsing of the
KubeRay manifests with the fields the operator needs, the runtime_env's fields, and every
``key=value`` given to ``learner.main`` in these files through the project's config loader.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

from learner.config import ConfigError, load_config, valid_keys

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER = CLUSTER / "ray-cluster.yaml"
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob.yaml"
VOLUMES = CLUSTER / "kuberay" / "volumes.yaml"
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"
CLUSTER_DOC = ROOT / "docs" / "cluster.md"


def load_one(path: Path) -> dict:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, f"{path} should hold one YAML document"
    return docs[0]


# --------------------------------------------------------------------- Ray cluster launcher


def prepared_launcher_config(config: dict) -> dict:
    """What `ray up` does before it contacts the cloud: merge the provider's defaults, merge
    setup commands, fill min/max workers, then validate against ray/autoscaler/ray-schema.json
    (jsonschema, strict about unknown fields) plus Ray's cross-field checks."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_launcher_config_passes_ray_validation():
    config = load_one(LAUNCHER)
    prepared = prepared_launcher_config(config)
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "no actors on the head: it owns the driver"
    workers = {name: t for name, t in types.items() if name != prepared["head_node_type"]}
    assert any(t["resources"].get("GPU", 0) >= 1 for t in workers.values()), "a GPU worker type"
    for name, node_type in workers.items():
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"], name
    # The project is shipped to the nodes and installed there.
    assert "." in config["file_mounts"].values()
    project_mount = next(remote for remote, local in config["file_mounts"].items() if local == ".")
    assert any(f"pip install -e {project_mount}" in cmd for cmd in prepared["head_setup_commands"])
    assert any(f"pip install -e {project_mount}" in cmd for cmd in prepared["worker_setup_commands"])
    assert "runs" in config["rsync_exclude"]


@pytest.mark.parametrize("mutate", [
    lambda c: c["available_node_types"]["gpu_worker"].update(min_worker=1),  # typo
    lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU=0.5),  # not an integer
    lambda c: c.update(head_node_type="nonexistent"),
    lambda c: c.update(max_workers=0),  # below the sum of min_workers
])
def test_launcher_validation_is_strict(mutate):
    """The check above means something: Ray rejects typos and inconsistent sizes."""
    config = load_one(LAUNCHER)
    mutate(config)
    with pytest.raises(Exception):
        prepared_launcher_config(config)


# --------------------------------------------------------------------- KubeRay manifests


def check_ray_cluster_spec(spec: dict, where: str) -> None:
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict), where
    for key, value in head["rayStartParams"].items():
        assert isinstance(value, str), f"{where}: headGroupSpec.rayStartParams.{key} must be a string"
    head_container = head["template"]["spec"]["containers"][0]
    assert head_container["image"], where
    ports = {p["containerPort"] for p in head_container["ports"]}
    assert {6379, 8265, 10001} <= ports, f"{where}: head ports GCS 6379, dashboard 8265, client 10001"
    groups = spec["workerGroupSpecs"]
    assert groups, where
    assert len({g["groupName"] for g in groups}) == len(groups), f"{where}: groupNames must be unique"
    gpu_groups = 0
    for group in groups:
        name = group["groupName"]
        assert isinstance(name, str) and name, where
        assert isinstance(group["rayStartParams"], dict), f"{where}: {name}.rayStartParams"
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), f"{where}: {name}"
        replicas, low, high = group["replicas"], group["minReplicas"], group["maxReplicas"]
        assert all(isinstance(n, int) for n in (replicas, low, high)), f"{where}: {name}"
        assert 0 <= low <= replicas <= high, f"{where}: {name} needs minReplicas <= replicas <= maxReplicas"
        container = group["template"]["spec"]["containers"][0]
        assert container["image"] == head_container["image"], f"{where}: {name} runs the head's image"
        gpu_groups += "nvidia.com/gpu" in container["resources"]["limits"]
    assert gpu_groups, f"{where}: a worker group with nvidia.com/gpu limits"
    # Every pod mounts the models and runs volumes at the paths the entrypoint uses.
    for template in [head["template"], *(g["template"] for g in groups)]:
        mounts = {m["mountPath"]: m["name"] for m in template["spec"]["containers"][0]["volumeMounts"]}
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in template["spec"]["volumes"] if "persistentVolumeClaim" in v}
        assert claims.get(mounts.get("/models")) == "carve3d-models", where
        assert claims.get(mounts.get("/runs")) == "carve3d-runs", where


def test_raycluster_manifest():
    cluster = load_one(RAYCLUSTER)
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    assert cluster["metadata"]["name"]
    check_ray_cluster_spec(cluster["spec"], "raycluster.yaml")


def test_rayjob_manifest():
    job = load_one(RAYJOB)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["metadata"]["name"]
    spec = job["spec"]
    assert "learner.main" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True and isinstance(spec["ttlSecondsAfterFinished"], int)
    check_ray_cluster_spec(spec["rayClusterSpec"], "rayjob.yaml")
    # One cluster definition in two files: the job's cluster is the long-lived one.
    assert spec["rayClusterSpec"] == load_one(RAYCLUSTER)["spec"], \
        "rayjob.yaml's rayClusterSpec differs from raycluster.yaml's spec; change both together"
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    check_runtime_env(runtime_env)
    assert runtime_env["env_vars"] == load_one(RUNTIME_ENV)["env_vars"]


def test_volumes_manifest():
    docs = [d for d in yaml.safe_load_all(VOLUMES.read_text()) if d]
    claims = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}
    assert set(claims) == {"carve3d-models", "carve3d-runs"}
    for claim in claims.values():
        assert claim["apiVersion"] == "v1" and "ReadWriteMany" in claim["spec"]["accessModes"]
        assert claim["spec"]["resources"]["requests"]["storage"]


# --------------------------------------------------------------------- runtime_env


def check_runtime_env(data: dict) -> None:
    from ray.runtime_env import RuntimeEnv

    # RuntimeEnv accepts unknown top-level keys (as plugin fields), so check names first.
    unknown = set(data) - RuntimeEnv.known_fields
    assert not unknown, f"not runtime_env fields: {sorted(unknown)}"
    RuntimeEnv(**data)  # type checks (e.g. env_vars must be str -> str); no network


def test_runtime_env():
    data = load_one(RUNTIME_ENV)
    check_runtime_env(data)
    assert "working_dir" not in data, "the working dir comes from --working-dir on the command line"
    assert "runs/" in data["excludes"] and ".git/" in data["excludes"]


# --------------------------------------------------------------------- config overrides


def learner_commands(text: str) -> list[list[str]]:
    """The arguments after every ``learner.main`` in ``text`` (shell line continuations
    joined; a command ends at a comment, a backtick or a shell operator)."""
    text = re.sub(r"\\\n\s*", " ", text)
    commands = []
    for match in re.finditer(r"learner\.main\b([^\n`]*)", text):
        rest = re.split(r"\s#|&&|\|\||;|\|", match.group(1))[0]
        commands.append(shlex.split(rest))
    return commands


def overrides_of(args: list[str]) -> list[str]:
    args = list(args)
    kept = []
    while args:
        arg = args.pop(0)
        if arg in ("--config", "-c") and args:
            kept += [arg, args.pop(0)]
        elif "=" in arg and not arg.startswith("-"):
            kept.append(arg)
    return kept


def check_overrides(overrides: list[str], where: str) -> None:
    """Through the project's loader: unknown keys, wrong types and bad ranges all fail.

    Values that name places on the cluster (a model directory, a run to resume) cannot exist
    here: model.path is checked with a stand-in model, and resume (a key of the config) is
    left out, as the loader would read that run's config.yaml."""
    args, rest = [], list(overrides)
    while rest:
        arg = rest.pop(0)
        if arg in ("--config", "-c"):
            args += [arg, str(ROOT / rest.pop(0))]
            continue
        key = arg.split("=", 1)[0]
        if key == "model.path":
            args.append("model.path=builtin:tiny")
        elif key != "resume":
            args.append(arg)
    try:
        load_config(args)
    except ConfigError as err:
        pytest.fail(f"{where}: python -m learner.main {' '.join(overrides)}\n{err}")


def documented_commands() -> list[tuple[str, list[str]]]:
    found = []
    for path in [ROOT / "README.md", CLUSTER_DOC, CLUSTER / "README.md", LAUNCHER, RUNTIME_ENV,
                 RAYCLUSTER, RAYJOB, CLUSTER / "Dockerfile"]:
        for args in learner_commands(path.read_text()):
            found.append((str(path.relative_to(ROOT)), overrides_of(args)))
    found.append(("rayjob.yaml entrypoint", overrides_of(
        learner_commands(load_one(RAYJOB)["spec"]["entrypoint"])[0])))
    return found


def test_documented_overrides_are_valid_config():
    commands = documented_commands()
    # The scan must see the commands it is meant to check.
    assert any(where == "docs/cluster.md" and overrides for where, overrides in commands)
    entrypoint = dict(commands)["rayjob.yaml entrypoint"]
    assert "rollout.num_workers=4" in entrypoint and any(o.startswith("model.path=") for o in entrypoint)
    for where, overrides in commands:
        check_overrides(overrides, where)


def test_override_check_catches_mistakes():
    for bad in (["rollout.workers=8"], ["reward.num_gpu=1"], ["rollout.num_workers=many"],
                ["train.samples_per_epoch=12"]):
        with pytest.raises(pytest.fail.Exception):
            check_overrides(bad, "test")
    assert overrides_of(learner_commands("ray job submit -- python -m learner.main \\\n"
                                         "    model.path=/m rollout.num_workers=8  # 8 GPUs\n")[0]) \
        == ["model.path=/m", "rollout.num_workers=8"]


def test_config_keys_named_in_cluster_docs_exist():
    """Prose and comments name keys too (`reward.num_gpus`, `run.output_dir`): each must exist."""
    keys = set(valid_keys())
    sections = sorted({k.split(".")[0] for k in keys if "." in k})
    pattern = re.compile(rf"(?<![\w./-])((?:{'|'.join(sections)})\.[a-z_][a-z0-9_.]*[a-z0-9_])")
    files = [CLUSTER_DOC, CLUSTER / "README.md", LAUNCHER, RUNTIME_ENV, RAYCLUSTER, RAYJOB, VOLUMES,
             CLUSTER / "Dockerfile"]
    named = {(str(path.relative_to(ROOT)), key) for path in files for key in pattern.findall(path.read_text())
             if not key.endswith((".json", ".md", ".yaml", ".py", ".png", ".parquet"))}
    assert any(key == "rollout.num_workers" for _, key in named)  # the scan sees the docs
    unknown = sorted((where, key) for where, key in named if key not in keys)
    assert not unknown, f"not keys of learner/config.py: {unknown}"
