"""Data for the language scripts: text corpora for causal LM, labelled text for sequence classification.

Local files need nothing beyond the standard library; Hub datasets (``wikitext-2``, GLUE tasks) are read with the
``datasets`` package when it is installed and the Hub (or its local cache) is reachable.
"""
import csv
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

# short names for the Hub's language-modelling corpora: name -> (dataset, config)
HUB_TEXT_DATASETS: Dict[str, Tuple[str, str]] = {
    'wikitext-2': ('wikitext', 'wikitext-2-raw-v1'),
    'wikitext-103': ('wikitext', 'wikitext-103-raw-v1'),
}

# GLUE tasks: (text column, pair column or None, validation split, regression)
GLUE_TASKS: Dict[str, Tuple[str, Optional[str], str, bool]] = {
    'cola': ('sentence', None, 'validation', False),
    'sst2': ('sentence', None, 'validation', False),
    'mrpc': ('sentence1', 'sentence2', 'validation', False),
    'qqp': ('question1', 'question2', 'validation', False),
    'stsb': ('sentence1', 'sentence2', 'validation', True),
    'mnli': ('premise', 'hypothesis', 'validation_matched', False),
    'qnli': ('question', 'sentence', 'validation', False),
    'rte': ('sentence1', 'sentence2', 'validation', False),
    'wnli': ('sentence1', 'sentence2', 'validation', False),
}

_TEXT_COLUMNS = ('text', 'sentence', 'sentence1', 'question1', 'premise', 'question')
_PAIR_COLUMNS = ('text_pair', 'sentence2', 'question2', 'hypothesis')


def _import_datasets(what: str):
    try:
        import datasets
    except ImportError:
        raise ImportError(f'{what} is read with the `datasets` package, which is not installed (pip install '
                          f'datasets); or pass local files instead') from None
    return datasets


# ---- causal LM text ----

def read_text_file(path: Union[str, os.PathLike]) -> str:
    """The text of a UTF-8 file (a leading byte-order mark is dropped).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is empty (or only whitespace), or is not valid UTF-8.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'text file {path} does not exist')
    with open(path, 'rb') as f:
        data = f.read()
    try:
        text = data.decode('utf-8-sig')
    except UnicodeDecodeError as e:
        raise ValueError(f'text file {path} is not valid UTF-8: byte 0x{data[e.start]:02x} at offset {e.start} '
                         f'({e.reason}); convert it, e.g. iconv -f latin1 -t utf-8') from None
    if not text.strip():
        raise ValueError(f'text file {path} is empty' + (' (only whitespace)' if data else ''))
    return text


def load_hub_text(name: str, config: Optional[str] = None) -> Dict[str, str]:
    """Splits (``train``, ``validation``, ...) of a Hub text dataset, each as one string; ``name`` may be a short
    name from ``HUB_TEXT_DATASETS``."""
    if name in HUB_TEXT_DATASETS and config is None:
        name, config = HUB_TEXT_DATASETS[name]
    datasets = _import_datasets(f'Hub dataset {name!r}')
    ds = datasets.load_dataset(name, config)
    out = {}
    for split, rows in ds.items():
        column = 'text' if 'text' in rows.column_names else rows.column_names[0]
        lines = rows[column]
        out[split] = ''.join(line if line.endswith('\n') else line + '\n' for line in lines)
    if 'train' not in out:
        raise ValueError(f'Hub dataset {name!r} has no train split (splits: {sorted(out)})')
    return out


def tokenize_text(tokenizer: Any, text: str, chunk_chars: int = 1 << 16) -> List[int]:
    """Token ids of a long text, without special tokens; encoded in line-aligned chunks so a transformers
    tokenizer never sees a sequence longer than ``chunk_chars`` characters."""
    lines = text.splitlines(keepends=True)
    chunks, current, size = [], [], 0
    for line in lines:
        current.append(line)
        size += len(line)
        if size >= chunk_chars:
            chunks.append(''.join(current))
            current, size = [], 0
    if current:
        chunks.append(''.join(current))
    ids: List[int] = []
    for chunk in chunks:
        ids += tokenizer(chunk, add_special_tokens=False)['input_ids']
    return ids


def token_blocks(ids: Sequence[int], block_size: int, what: str = 'text') -> torch.Tensor:
    """``[n, block_size]`` consecutive blocks of ``ids`` (the remainder is dropped)."""
    n = len(ids) // block_size
    if n == 0:
        raise ValueError(f'{what} has {len(ids)} tokens, fewer than one block of {block_size}; '
                         f'use more text or a smaller --block-size')
    return torch.tensor(list(ids[:n * block_size]), dtype=torch.long).view(n, block_size)


# ---- sequence classification ----

@dataclass
class LabelledTexts:
    """Texts (and optional second texts of a pair) with raw labels, as read from a file or the Hub."""
    texts: List[str]
    pairs: Optional[List[str]]
    labels: List[Any]
    source: str


def _rows_from_file(path: str) -> List[Dict[str, Any]]:
    ext = os.path.splitext(path)[1].lower()
    if not os.path.isfile(path):
        raise FileNotFoundError(f'data file {path} does not exist')
    try:
        with open(path, encoding='utf-8-sig', newline='') as f:
            if ext in ('.csv', '.tsv'):
                rows = list(csv.DictReader(f, delimiter='\t' if ext == '.tsv' else ','))
            elif ext in ('.json', '.jsonl'):
                content = f.read()
                stripped = content.lstrip()
                if stripped.startswith('['):
                    rows = json.loads(content)
                else:
                    rows = [json.loads(line) for line in content.splitlines() if line.strip()]
            else:
                raise ValueError(f'data file {path}: unsupported extension {ext!r}; use .csv, .tsv, .json or .jsonl')
    except UnicodeDecodeError as e:
        raise ValueError(f'data file {path} is not valid UTF-8 ({e.reason} at byte {e.start})') from None
    except json.JSONDecodeError as e:
        raise ValueError(f'data file {path} is not valid JSON / JSON lines: {e}') from None
    if not rows:
        raise ValueError(f'data file {path} has no rows')
    if not all(isinstance(r, dict) for r in rows):
        raise ValueError(f'data file {path}: every row must be an object with text and label fields')
    return rows


def read_labelled_file(path: Union[str, os.PathLike], text_column: Optional[str] = None,
                       pair_column: Optional[str] = None, label_column: str = 'label') -> LabelledTexts:
    """Read ``text[,text_pair],label`` rows from a CSV, TSV, JSON (a list of objects) or JSON-lines file.

    Columns default to the first present of ``text, sentence, sentence1, question1, premise, question`` and of
    ``text_pair, sentence2, question2, hypothesis`` (no pair if none is present).
    """
    path = os.fspath(path)
    rows = _rows_from_file(path)
    columns = list(rows[0].keys())
    text_column = text_column or next((c for c in _TEXT_COLUMNS if c in columns), None)
    if text_column is None or text_column not in columns:
        raise ValueError(f'data file {path}: no text column {text_column or _TEXT_COLUMNS}; columns are {columns}')
    if pair_column is None:
        pair_column = next((c for c in _PAIR_COLUMNS if c in columns and c != text_column), None)
    elif pair_column not in columns:
        raise ValueError(f'data file {path}: no pair column {pair_column!r}; columns are {columns}')
    if label_column not in columns:
        raise ValueError(f'data file {path}: no label column {label_column!r}; columns are {columns}')
    texts, pairs, labels = [], [] if pair_column else None, []
    for i, row in enumerate(rows, start=1):
        label = row.get(label_column)
        if label is None or (isinstance(label, str) and not label.strip()):
            raise ValueError(f'data file {path}: row {i} has no label')
        text = row.get(text_column)
        if not isinstance(text, str):
            raise ValueError(f'data file {path}: row {i} has no text in column {text_column!r}')
        texts.append(text)
        if pairs is not None:
            pairs.append(str(row.get(pair_column) or ''))
        labels.append(label.strip() if isinstance(label, str) else label)
    return LabelledTexts(texts, pairs, labels, path)


def load_glue(task: str) -> Tuple[LabelledTexts, LabelledTexts, List[Any]]:
    """Train and validation data of a GLUE task from the Hub, and its label names."""
    text_column, pair_column, validation, _ = GLUE_TASKS[task]
    datasets = _import_datasets(f'GLUE task {task!r}')
    ds = datasets.load_dataset('nyu-mll/glue', task)
    features = ds['train'].features['label']
    names = list(getattr(features, 'names', []) or [])

    def convert(split: str) -> LabelledTexts:
        rows = ds[split]
        return LabelledTexts(list(rows[text_column]), list(rows[pair_column]) if pair_column else None,
                             list(rows['label']), f'glue/{task}/{split}')
    return convert('train'), convert(validation), names


def normalize_task(task: Optional[str]) -> Optional[str]:
    """``'SST-2'`` -> ``'sst2'``, ``'STS-B'`` -> ``'stsb'``; checks the name is a GLUE task."""
    if task is None:
        return None
    key = task.lower().replace('-', '').replace('_', '')
    if key not in GLUE_TASKS:
        raise ValueError(f'unknown GLUE task {task!r}; expected one of {sorted(GLUE_TASKS)}')
    return key


def _label_key(label: Any) -> str:
    if isinstance(label, float) and label.is_integer():
        label = int(label)
    return str(label)


def label_set(labels: Sequence[Any], given: Optional[Sequence[str]] = None) -> List[str]:
    """The ordered label set: ``given``, or the distinct labels in numeric order when all are integers, else
    alphabetical. Labels are compared as strings (``1``, ``1.0`` and ``"1"`` are the same label)."""
    if given:
        return [_label_key(g) for g in given]
    keys = sorted({_label_key(lab) for lab in labels})
    if all(k.lstrip('-').isdigit() for k in keys):
        keys.sort(key=int)
    return keys


def encode_labels(data: LabelledTexts, labels: Sequence[str]) -> List[int]:
    """Class ids of ``data``'s labels in ``labels``.

    Raises:
        ValueError: a label is outside the label set (naming the row, the label and the set).
    """
    index = {lab: i for i, lab in enumerate(labels)}
    out = []
    for i, label in enumerate(data.labels, start=1):
        key = _label_key(label)
        if key not in index:
            raise ValueError(
                f'{data.source}: row {i} has label {label!r}, which is outside the label set {list(labels)}')
        out.append(index[key])
    return out


def encode_targets(data: LabelledTexts) -> List[float]:
    """Regression targets as floats (raises ``ValueError`` naming the first non-numeric row)."""
    out = []
    for i, label in enumerate(data.labels, start=1):
        try:
            out.append(float(label))
        except (TypeError, ValueError):
            raise ValueError(f'{data.source}: row {i} has label {label!r}, not a number (regression task)') from None
    return out


def encode_texts(tokenizer: Any, data: LabelledTexts, max_length: int) -> List[List[int]]:
    """Token ids (with the tokenizer's special tokens) of every text or text pair, truncated to ``max_length``."""
    out = []
    pairs = data.pairs if data.pairs is not None else [None] * len(data.texts)
    for text, pair in zip(data.texts, pairs):
        ids = tokenizer(text, pair, truncation=True, max_length=max_length)['input_ids']
        if not ids:
            raise ValueError(f'{data.source}: a text encodes to no tokens')
        out.append(list(ids))
    return out


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int) -> Dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` for a batch of id lists."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, :len(s)] = 1
    return {'input_ids': ids, 'attention_mask': mask}
