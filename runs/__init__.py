"""Runs: the floor above editors. Training an editor (`training.py`), the evaluation protocol
(`evaluation.py`, `results.py`), the records of a split (`data.py`), the tiny backbones'
pretraining on the toy world (`pretrain.py`) and the command-line flags (`cli.py`).

Floors look down only: `utils` < `toyworld` < `editors` < `runs` < the entry scripts.
"""
