"""bertrecipes: BERT pre-training (MLM + NSP) and SQuAD fine-tuning recipes.

Pre-train:  python -m bertrecipes.pretrain +phase=seq128
"""

__version__ = "0.1.0"
