"""Data: tokenizers, corpora, the token cache, packing and the LightningDataModule."""

from mdlm_kit.data.corpora import load_corpus
from mdlm_kit.data.datamodule import TextDataModule
from mdlm_kit.data.tokenizers import Tokenizer, build_tokenizer, load_gpt2, tokenizer_from_dict

__all__ = ["TextDataModule", "Tokenizer", "build_tokenizer", "load_corpus", "load_gpt2", "tokenizer_from_dict"]
