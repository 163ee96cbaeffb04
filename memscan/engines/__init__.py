"""Runners for scale-out behind the local runner's interfaces: same inputs, same outputs."""
