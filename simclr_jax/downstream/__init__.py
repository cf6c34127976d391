"""Modes that start from another run: linear_eval, finetune, distill, embed."""
