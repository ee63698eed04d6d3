"""The teacher-feature cache: the frozen teacher runs once per image in a run (see docs/architecture.md)."""
