"""LiveEdit (editor.py) and the paper's Table-2 ablations as config overrides (ablations.py).

Importing the package loads no torch: `ablation_config` is what a tables command needs to name the
ablated configs; `editors.load_editor("liveedit", ...)` builds the editor.
"""
from .ablations import ablated_config, ablation_config, ablation_description, ablation_names

__all__ = ["ablated_config", "ablation_config", "ablation_description", "ablation_names"]
