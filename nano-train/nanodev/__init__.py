"""Development code of the embedded nano models: the synthetic world they learn from
(:mod:`nanodev.world`), the programmatic prompt-adherence scorer (:mod:`nanodev.scorer`), the
trainer (:mod:`nanodev.train`), the evaluator (:mod:`nanodev.evaluate`) and the model shapes
(:mod:`nanodev.configs`).

Not part of the installed ``krea2kit`` package, which ships only the exported weights and the
model card (``src/krea2kit/nano/weights/``) and reads every shape from those files. Run from
the repository root with this folder on the import path::

    PYTHONPATH=nano-train python -m nanodev.train all --out DIR --threads 1
    PYTHONPATH=nano-train python -m nanodev.evaluate --preset krea2-nano-raw

The test suite finds it through ``pythonpath`` in ``pyproject.toml``.
"""
