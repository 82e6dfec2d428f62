"""The bottom layer: data containers every other package may use (imports only torch and numpy)."""
