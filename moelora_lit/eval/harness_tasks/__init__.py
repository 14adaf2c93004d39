"""lm-evaluation-harness task YAMLs that read LLM-Adapters-format files offline (``dataset_path: json``).

Each ``moelora_<task>.yaml`` turns a row into the harness's own zero-shot document with
:func:`moelora_lit.eval.choices.harness_doc` (``utils.py``); ``python -m moelora_lit lm-eval`` points
``dataset_kwargs.data_files`` at the file given with ``--data TASK=PATH``.
"""
