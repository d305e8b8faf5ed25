"""SQuAD v1.1 fine-tuning (DeepSpeed BingBertSquad's recipe) and the official EM/F1 evaluation.

    python -m bertrecipes.squad train_file=train-v1.1.json predict_file=dev-v1.1.json \
        model_file=<pre-training run>/checkpoints
    python -m bertrecipes.squad.evaluate dev-v1.1.json predictions.json

Modules: ``data`` (examples, windows), ``model`` (BertForQuestionAnswering, loss), ``postprocess``
(n-best spans), ``evaluate`` (official metric), ``engine`` (train / predict / score), ``config``
(typed schema). This package file imports nothing heavy, so the evaluator starts fast.
"""
