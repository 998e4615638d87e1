"""Hugging Face in and out: models from a ``save_pretrained`` directory, data from
CSV/TSV/JSONL/JSON/TXT files or a ``datasets`` directory, compressed models written back as
directories that ``transformers`` loads without rmtkd (``trust_remote_code``), and ONNX.

Keep this file free of imports: :mod:`rmtkd.nn` and :mod:`rmtkd.reduce` import
:mod:`rmtkd.hf.modeling_rmtkd` (the head modules, ProjectedLinear's parameters and the
reshape from recorded widths live there) while rmtkd itself is being imported."""
