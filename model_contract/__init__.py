"""The model directory: the one contract between the trainer (which writes it) and the sidecar (which reads it).

Both sides import this package and nothing of each other. It is written here once; ARCHITECTURE.md and
docs/training.md point here.

==========================  =================================================================================
file                        what
==========================  =================================================================================
``config.json``             Hugging Face config: ``id2label``/``label2id``; ``sidecar_task`` (``category``:
                            sequence classification, ``pii``: BIO token classification with Presidio entity
                            names); ``sidecar_max_length`` (tokens per window in training, the window it is
                            served at); ``cls_token_id``, ``sep_token_id``, ``pad_token_id``;
                            ``max_position_embeddings``
``tokenizer.json``          a fast tokenizer whose post-processor frames text as CLS ... SEP
                            (+ ``tokenizer_config.json``)
``model.safetensors``       PyTorch weights (may be left out once ONNX files exist)
``model.onnx``              fp32 ONNX: inputs ``input_ids``, ``attention_mask`` (int64 ``[batch, sequence]``),
                            output ``logits``
``model.int8.onnx``         the same, INT8 (static; the CPU default)
``eval_results.json``       metrics, data, settings, time, export parity, served scores: written only through
                            `model_contract.eval_results`
``README.md``               the model card, rendered from ``eval_results.json``
==========================  =================================================================================

Offsets are Python string indices (code points), half-open ``[start, end)``. Reading a directory
(`model_contract.model_dir.ModelDir.read`) never loads weights: that is the sidecar's backends' job.
"""
