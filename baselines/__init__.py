"""The merge rules compared with ARM: linear, task arithmetic, TIES, ExPO, DARE.

Each module implements one per-tensor rule of the contract in ``arm/merge/contract.py``
(``TensorRule``) and is registered by name in ``arm/merge/registry.py``. Nothing else lives here.
"""
