"""Data: tokenizers, corpora, packing and the LightningDataModule."""

from mdlm_kit.data.corpora import Corpus, load_corpus
from mdlm_kit.data.datamodule import BlockDataset, TextDataModule, pack_wrap
from mdlm_kit.data.tokenizers import CharTokenizer, Tokenizer, build_tokenizer, load_gpt2, tokenizer_from_dict

__all__ = [
    "BlockDataset",
    "CharTokenizer",
    "Corpus",
    "TextDataModule",
    "Tokenizer",
    "build_tokenizer",
    "load_corpus",
    "load_gpt2",
    "pack_wrap",
    "tokenizer_from_dict",
]
