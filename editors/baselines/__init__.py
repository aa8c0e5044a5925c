"""Baseline editors (spec §7). Registered in `editors.EDITORS`; imported lazily from there."""
