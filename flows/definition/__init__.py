"""WHAT the pipeline is: its settings (the one typed model of ``params.yaml``, the run form and DVC's parameters),
its stages (the stage table, declarations only), what a stage may read (``declared``), and which code it runs
(``code_deps``). Imports nothing else of :mod:`flows`; nothing heavy at import time.
"""
