"""camex_vision.nlp: byte tokenizer, data readers and metrics, checked against hand-computed values."""
import json

import pytest

pytest.importorskip('transformers')
from camex_vision.nlp import ByteTokenizer  # noqa: E402
from camex_vision.nlp.data import (  # noqa: E402
    encode_labels, encode_targets, label_set, normalize_task, read_labelled_file, read_text_file, token_blocks)
from camex_vision.nlp.metrics import (  # noqa: E402
    accuracy, classification_metrics, f1, matthews_correlation, pearson, regression_metrics, spearman)


# ---- tokenizer ----

def test_byte_tokenizer_round_trips_utf8():
    tok = ByteTokenizer()
    text = 'Café ☕, naïve'
    ids = tok.encode(text)
    assert ids[:-1] == list(text.encode('utf-8')) and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(ids) == text + '<eos>'
    assert tok.decode([0xE2, 0x98]) == '\ufffd'  # a cut multi-byte character decodes to U+FFFD
    assert len(tok) == 259 and {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id} == {256, 257, 258}


def test_byte_tokenizer_pairs_truncate_longest_first():
    tok = ByteTokenizer()
    ids = tok.encode('abcdefghij', 'xyz', truncation=True, max_length=10)  # 8 text slots: 3 kept for the pair
    assert ids == list(b'abcde') + [258] + list(b'xyz') + [258]
    ids = tok.encode('abcdefghij', 'uvwxyz', truncation=True, max_length=8)  # both long: 3 + 3
    assert ids == list(b'abc') + [258] + list(b'uvw') + [258]
    with pytest.raises(ValueError, match='no room'):
        tok.encode('a', 'b', truncation=True, max_length=1)


@pytest.mark.parametrize('side', ['right', 'left'])
def test_byte_tokenizer_pads_batches(side, tmp_path):
    tok = ByteTokenizer(padding_side=side)
    batch = tok(['ab', 'abcd'], add_special_tokens=False, return_tensors='pt')
    pad = tok.pad_token_id
    expected = [[97, 98, pad, pad], [97, 98, 99, 100]] if side == 'right' else [[pad, pad, 97, 98], [97, 98, 99, 100]]
    assert batch['input_ids'].tolist() == expected
    assert batch['attention_mask'].tolist() == [[int(i != pad) for i in row] for row in expected]
    tok.save_pretrained(tmp_path)
    assert ByteTokenizer.is_saved_in(tmp_path) and ByteTokenizer.from_pretrained(tmp_path).padding_side == side
    assert tok('hi')['input_ids'] == [104, 105, 258]


# ---- text and labelled files ----

def test_read_text_file_rejects_empty_and_non_utf8(tmp_path):
    good = tmp_path / 'good.txt'
    good.write_bytes('\ufeffIt is a truth.'.encode('utf-8'))
    assert read_text_file(good) == 'It is a truth.'
    empty = tmp_path / 'empty.txt'
    empty.write_bytes(b'')
    with pytest.raises(ValueError, match='empty'):
        read_text_file(empty)
    blank = tmp_path / 'blank.txt'
    blank.write_text(' \n\n\t')
    with pytest.raises(ValueError, match='empty.*whitespace'):
        read_text_file(blank)
    latin1 = tmp_path / 'latin1.txt'
    latin1.write_bytes('Café'.encode('latin-1'))
    with pytest.raises(ValueError, match=r'not valid UTF-8: byte 0xe9 at offset 3'):
        read_text_file(latin1)
    with pytest.raises(FileNotFoundError):
        read_text_file(tmp_path / 'missing.txt')


def test_token_blocks():
    blocks = token_blocks(list(range(10)), 4)
    assert blocks.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError, match='fewer than one block'):
        token_blocks([1, 2], 4, 'tiny.txt')


def test_labelled_files_and_label_sets(tmp_path):
    csv_path = tmp_path / 'train.csv'
    csv_path.write_text('sentence1,sentence2,label\na,b,10\nc,d,2\ne,f,2\n', encoding='utf-8')
    data = read_labelled_file(csv_path)
    assert data.texts == ['a', 'c', 'e'] and data.pairs == ['b', 'd', 'f'] and data.labels == ['10', '2', '2']
    labels = label_set(data.labels)
    assert labels == ['2', '10']  # numeric order, not alphabetical
    assert encode_labels(data, labels) == [1, 0, 0]
    jsonl = tmp_path / 'dev.jsonl'
    jsonl.write_text('\n'.join(json.dumps({'text': t, 'label': y}) for t, y in [('x', 2), ('y', 7)]), encoding='utf-8')
    dev = read_labelled_file(jsonl)
    assert dev.pairs is None
    with pytest.raises(ValueError, match=r"row 2 has label 7, which is outside the label set \['2', '10'\]"):
        encode_labels(dev, labels)
    js = tmp_path / 'reg.json'
    js.write_text(json.dumps([{'text': 'x', 'score': 0.5}, {'text': 'y', 'score': 'high'}]), encoding='utf-8')
    reg = read_labelled_file(js, label_column='score')
    with pytest.raises(ValueError, match="row 2 has label 'high', not a number"):
        encode_targets(reg)
    with pytest.raises(ValueError, match="no label column 'label'"):
        read_labelled_file(js)


def test_glue_task_names():
    assert normalize_task('SST-2') == 'sst2' and normalize_task('sts_b') == 'stsb'
    with pytest.raises(ValueError, match='unknown GLUE task'):
        normalize_task('squad')


# ---- metrics (hand-computed) ----

PREDS, LABELS = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]


def test_classification_metrics_by_hand():
    assert accuracy(PREDS, LABELS) == 3 / 5
    assert f1(PREDS, LABELS) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))  # tp 2, fp 1, fn 1
    assert matthews_correlation(PREDS, LABELS) == pytest.approx((2 * 1 - 1 * 1) / (3 * 3 * 2 * 2) ** 0.5)
    assert matthews_correlation([0, 0, 0], [0, 1, 0]) == 0.  # constant predictions: undefined -> 0
    # three classes: per-class F1 1, 1/2, 0 -> macro 1/2
    assert f1([0, 1, 1, 2], [0, 1, 2, 1], num_classes=3) == pytest.approx((1 + 1 / 2 + 0) / 3)


def test_regression_metrics_by_hand():
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(5 / (2 * 114 / 9) ** 0.5)
    # ties share ranks: x ranks 1, 2.5, 2.5, 4
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / (4.5 * 5) ** 0.5)
    assert regression_metrics([1, 2, 3], [1, 2, 3]) == {'pearson': pytest.approx(1.), 'spearmanr': pytest.approx(1.)}


def test_glue_metrics_per_task():
    assert set(classification_metrics(PREDS, LABELS, 2, 'cola')) == {'matthews_correlation'}
    assert set(classification_metrics(PREDS, LABELS, 2, 'mrpc')) == {'accuracy', 'f1'}
    assert set(classification_metrics(PREDS, LABELS, 2, 'rte')) == {'accuracy'}
    assert set(classification_metrics(PREDS, LABELS, 2)) == {'accuracy', 'f1', 'matthews_correlation'}
    with pytest.raises(ValueError, match='no predictions'):
        accuracy([], [])
