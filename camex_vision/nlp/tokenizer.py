"""A byte-level tokenizer that needs no download: ids 0-255 are the UTF-8 bytes, then ``<pad>``, ``<bos>``, ``<eos>``.

It speaks the small part of transformers' tokenizer interface the training scripts and ``generate`` use:
``tok(text, text_pair, truncation=..., max_length=..., padding=..., return_tensors='pt')``, ``encode``, ``decode``,
``batch_decode``, ``pad_token_id``/``bos_token_id``/``eos_token_id``, ``len(tok)`` and
``save_pretrained``/``from_pretrained``.
"""
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

_FILE = 'byte_tokenizer.json'

TextInput = Union[str, Sequence[str]]


class ByteTokenizer:
    """UTF-8 bytes as tokens. Sequences are ``text <eos>`` or ``text <eos> pair <eos>`` with special tokens.

    Args:
        padding_side: ``'right'`` (default) or ``'left'``.
        model_max_length: default ``max_length`` for truncation.
    """
    pad_token_id = 256
    bos_token_id = 257
    eos_token_id = 258
    vocab_size = 259
    special_tokens = {'<pad>': 256, '<bos>': 257, '<eos>': 258}

    def __init__(self, padding_side: str = 'right', model_max_length: int = 1024):
        if padding_side not in ('right', 'left'):
            raise ValueError(f'padding_side={padding_side!r} must be "right" or "left"')
        self.padding_side = padding_side
        self.model_max_length = model_max_length

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f'ByteTokenizer(vocab_size={self.vocab_size}, padding_side={self.padding_side!r})'

    @property
    def pad_token(self) -> str:
        return '<pad>'

    @property
    def eos_token(self) -> str:
        return '<eos>'

    def encode(self, text: str, text_pair: Optional[str] = None, add_special_tokens: bool = True,
               truncation: bool = False, max_length: Optional[int] = None) -> List[int]:
        """Token ids of one text (or pair); with ``truncation`` the texts are cut, longer first, to ``max_length``."""
        parts = [list(text.encode('utf-8'))] + ([list(text_pair.encode('utf-8'))] if text_pair is not None else [])
        specials = len(parts) if add_special_tokens else 0
        if truncation:
            limit = (max_length or self.model_max_length) - specials
            if limit < len(parts):
                raise ValueError(f'max_length={max_length} leaves no room for text after {specials} special tokens')
            parts = self._truncate(parts, limit)
        ids: List[int] = []
        for part in parts:
            ids += part + ([self.eos_token_id] if add_special_tokens else [])
        return ids

    @staticmethod
    def _truncate(parts: List[List[int]], limit: int) -> List[List[int]]:
        """Cut ``parts`` to ``limit`` ids in total, always from the longer one (transformers' ``longest_first``)."""
        if len(parts) == 1:
            return [parts[0][:limit]]
        a, b = (len(p) for p in parts)
        if a + b <= limit:
            return parts
        short = min(a, b)
        if short <= limit // 2:
            keep = (limit - short, short) if a >= b else (short, limit - short)
        else:
            keep = ((limit + 1) // 2, limit // 2)
        return [parts[0][:keep[0]], parts[1][:keep[1]]]

    def __call__(self, text: TextInput, text_pair: Optional[TextInput] = None, add_special_tokens: bool = True,
                 truncation: bool = False, max_length: Optional[int] = None, padding: Union[bool, str] = False,
                 return_tensors: Optional[str] = None, **unused: Any) -> Dict[str, Any]:
        """Encode a text or a batch; returns ``input_ids`` and ``attention_mask`` (lists, or tensors with
        ``return_tensors='pt'``, which pads)."""
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        pairs = [text_pair] if single else (list(text_pair) if text_pair is not None else [None] * len(texts))
        if len(pairs) != len(texts):
            raise ValueError(f'{len(texts)} texts but {len(pairs)} text pairs')
        ids = [self.encode(t, p, add_special_tokens, truncation, max_length) for t, p in zip(texts, pairs)]
        if padding or return_tensors == 'pt':
            if padding == 'max_length':
                width = max_length or self.model_max_length
            else:
                width = max((len(i) for i in ids), default=0)
            batch = self.pad(ids, width)
        else:
            batch = {'input_ids': ids, 'attention_mask': [[1] * len(i) for i in ids]}
        if return_tensors == 'pt':
            batch = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
        elif return_tensors is not None:
            raise ValueError(f'return_tensors={return_tensors!r} is not supported; use "pt" or None')
        if single and return_tensors is None:
            batch = {k: v[0] for k, v in batch.items()}
        return batch

    def pad(self, ids: Sequence[Sequence[int]], width: int) -> Dict[str, List[List[int]]]:
        """Pad id lists to ``width`` on ``padding_side``; returns ``input_ids`` and ``attention_mask``."""
        out_ids, out_mask = [], []
        for seq in ids:
            seq = list(seq)[:width]
            fill = width - len(seq)
            pad, ones = [self.pad_token_id] * fill, [1] * len(seq)
            if self.padding_side == 'right':
                out_ids.append(seq + pad)
                out_mask.append(ones + [0] * fill)
            else:
                out_ids.append(pad + seq)
                out_mask.append([0] * fill + ones)
        return {'input_ids': out_ids, 'attention_mask': out_mask}

    def decode(self, ids: Union[Sequence[int], torch.Tensor], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; invalid UTF-8 byte sequences decode to U+FFFD."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        names = {v: k for k, v in self.special_tokens.items()}
        out, pending = [], bytearray()
        for i in ids:
            if 0 <= i < 256:
                pending.append(i)
                continue
            out.append(pending.decode('utf-8', errors='replace'))
            pending = bytearray()
            if not skip_special_tokens:
                out.append(names.get(i, '<unk>'))
        out.append(pending.decode('utf-8', errors='replace'))
        return ''.join(out)

    def batch_decode(self, sequences: Union[Sequence[Sequence[int]], torch.Tensor],
                     skip_special_tokens: bool = False) -> List[str]:
        """``decode`` for each sequence."""
        return [self.decode(s, skip_special_tokens) for s in sequences]

    def save_pretrained(self, path: Union[str, os.PathLike]) -> None:
        """Write the tokenizer's settings to ``path/byte_tokenizer.json``."""
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, _FILE), 'w', encoding='utf-8') as f:
            json.dump({'padding_side': self.padding_side, 'model_max_length': self.model_max_length}, f)

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike]) -> 'ByteTokenizer':
        """Read a tokenizer written by ``save_pretrained``."""
        with open(os.path.join(path, _FILE), encoding='utf-8') as f:
            return cls(**json.load(f))

    @staticmethod
    def is_saved_in(path: Union[str, os.PathLike]) -> bool:
        """Whether ``path`` holds a saved ``ByteTokenizer``."""
        return os.path.isfile(os.path.join(path, _FILE))
