"""Model merging as tree-map operations over pytrees.

>>> import merging as mg
>>> merged = mg.ties([ft1, ft2], base=base, weights=[0.6, 0.4], density=0.5)  # doctest: +SKIP
>>> merged = mg.slerp(a, b, t=0.3)                                           # doctest: +SKIP
>>> adapter = mg.merge_adapters([ad1, ad2], "svd", weights=[0.5, 0.5], rank=8)  # doctest: +SKIP

Every method is one per-tensor function registered by name (`@mg.method`, with its
parameters, defaults, ranges, base policy and number of models declared once);
`mg.METHODS` maps names to `mg.Method` entries, `mg.merge(name, models, base,
**params)` runs one by name, `mg.<name>` is its generated tree function and
`mg.method_table()` the README's table. The command line
`lora-jax merge CONFIG.yml OUT_DIR` is `merging.cli:main`.
"""

from merging import _sparsify as sparsify
from merging._adapters import merge_adapters
from merging._methods import (METHODS, Method, MethodInfo, P, breadcrumbs, breadcrumbs_ties,
                              dare_linear, dare_ties, della, della_linear, linear, linear_leaf,
                              merge,
                              model_stock, model_stock_leaf, nuslerp, nuslerp_leaf, passthrough,
                              method, register, slerp, slerp_leaf, stack_layers,
                              task_arithmetic, task_vector_leaf, task_vector_method, ties)
from merging._registry import method_table
from merging._params import Conditions, PerModel
from merging._selective import (arcee_fusion, arcee_fusion_leaf, nearswap, nearswap_leaf, ram,
                               ram_leaf, ramplus_tl, sce, sce_leaf)
from merging._sphere import karcher, karcher_leaf, multislerp, multislerp_leaf

__all__ = [
    "METHODS", "Method", "MethodInfo", "P", "method", "method_table", "task_vector_method",
    "Conditions", "PerModel", "breadcrumbs", "breadcrumbs_ties",
    "dare_linear", "dare_ties", "della", "della_linear", "linear", "linear_leaf", "merge",
    "merge_adapters", "model_stock", "model_stock_leaf", "nuslerp", "nuslerp_leaf",
    "passthrough", "register", "slerp", "slerp_leaf", "sparsify", "stack_layers",
    "task_arithmetic", "task_vector_leaf", "ties", "karcher", "karcher_leaf", "multislerp",
    "multislerp_leaf", "nearswap", "nearswap_leaf", "sce", "sce_leaf", "arcee_fusion",
    "arcee_fusion_leaf", "ram", "ramplus_tl", "ram_leaf",
]
