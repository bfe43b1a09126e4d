"""camex_vision.nlp training scripts: a real short CLM run, classification, checkpoints and resume, bad input."""
import csv
import json
import random

import pytest

pytest.importorskip('transformers')
from camex_vision.nlp import from_pretrained, is_camexified, train_classification, train_clm  # noqa: E402
from camex_vision.nlp import training  # noqa: E402

GPT2_TINY = 'n_embd=32,n_layer=2,n_head=2,n_positions=64'
T5_TINY = 'd_model=32,d_ff=64,num_layers=2,num_heads=2,d_kv=16'


pytestmark = pytest.mark.usefixtures('one_thread')


def write_corpus(path, sentences: int = 800, seed: int = 0):
    """A small text with learnable structure: sentences from a tiny grammar."""
    rng = random.Random(seed)
    subjects = ['the cat', 'a dog', 'my friend', 'the old man', 'her sister', 'our teacher']
    verbs = ['sees', 'likes', 'finds', 'follows', 'paints']
    objects = ['the ball', 'a red house', 'the garden', 'his hat', 'the river']
    path.write_text('\n'.join(f'{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}.'
                              for _ in range(sentences)), encoding='utf-8')
    return path


def write_labelled(path, rows: int, seed: int, label_names=('negative', 'positive'), pair: bool = False):
    """Sentiment-like rows whose label is decided by one keyword."""
    rng = random.Random(seed)
    keywords = {label_names[0]: ['bad', 'awful', 'dull'], label_names[1]: ['good', 'great', 'lovely']}
    filler = ['the', 'day', 'was', 'a', 'very', 'story', 'it', 'and', 'film']
    fields = ['sentence1', 'sentence2', 'label'] if pair else ['text', 'label']
    with open(path, 'w', encoding='utf-8', newline='') as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        for _ in range(rows):
            label = rng.choice(label_names)
            words = rng.choices(filler, k=4) + [rng.choice(keywords[label])]
            rng.shuffle(words)
            text = ' '.join(words)
            writer.writerow({'sentence1': text, 'sentence2': ' '.join(rng.choices(filler, k=3)), 'label': label}
                            if pair else {'text': text, 'label': label})
    return path


def clm_args(tmp_path, text, *extra):
    return ['--train-file', str(text), '--tokenizer', 'byte', '--config-overrides', GPT2_TINY, '--block-size', '32',
            '--batch-size', '16', '--num-experts', '4', '--segment-length', '8', '--lr', '3e-3', '--log-every', '0',
            '--output-dir', str(tmp_path / 'out'), *extra]


def test_clm_200_steps_reduce_validation_loss(tmp_path):
    text = write_corpus(tmp_path / 'corpus.txt')
    history = train_clm.main(clm_args(tmp_path, text, '--max-steps', '200'))
    first, last = history[0], history[-1]
    assert first['step'] == 0 and last['step'] == 200
    assert last['val_loss'] < 0.4 * first['val_loss'], history  # ~5.6 (uniform over 259 bytes) -> ~1.4
    assert last['perplexity'] < 6
    out = tmp_path / 'out'
    with open(out / 'metrics.csv', encoding='utf-8') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(history) and {'epoch', 'val_loss', 'perplexity', 'train_loss'} <= set(rows[0])
    model = from_pretrained(out / 'model')
    assert is_camexified(model) and model.config.camex['segment_length'] == 8
    results = json.loads((out / 'results.json').read_text())
    assert results['val_loss'] == pytest.approx(last['val_loss'])


def test_clm_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    text = write_corpus(tmp_path / 'corpus.txt', sentences=150)
    args = clm_args(tmp_path, text, '--num-epochs', '3', '--skip-initial-eval')
    straight = train_clm.main(args + ['--output-dir', str(tmp_path / 'straight')])

    real_save = training.save_checkpoint
    calls = []

    def crash_after_second_epoch(path, state):
        real_save(path, state)
        calls.append(path)
        if len(calls) == 2:
            raise RuntimeError('simulated crash')

    monkeypatch.setattr(training, 'save_checkpoint', crash_after_second_epoch)
    with pytest.raises(RuntimeError, match='simulated crash'):
        train_clm.main(args)
    monkeypatch.setattr(training, 'save_checkpoint', real_save)
    with pytest.raises(ValueError, match='already holds a checkpoint'):
        train_clm.main(args)
    resumed = train_clm.main(args + ['--resume', 'auto'])
    assert [r['epoch'] for r in resumed] == [1, 2, 3]
    for a, b in zip(straight, resumed):
        assert {k: v for k, v in a.items() if k != 'seconds'} == {k: v for k, v in b.items() if k != 'seconds'}
    assert not list((tmp_path / 'out').glob('*.tmp-*'))  # atomic writes leave no temporary files


def test_clm_continues_from_a_saved_converted_model(tmp_path):
    text = write_corpus(tmp_path / 'corpus.txt', sentences=150)
    first = train_clm.main(clm_args(tmp_path, text, '--max-steps', '5', '--dynamic', '--merge', 'euclidean'))
    again = train_clm.main(clm_args(tmp_path, text, '--max-steps', '5', '--model-name-or-path',
                                    str(tmp_path / 'out' / 'model'), '--output-dir', str(tmp_path / 'again')))
    assert again[0]['val_loss'] == pytest.approx(first[-1]['val_loss'], abs=1e-4)  # starts where the first ended
    options = from_pretrained(tmp_path / 'again' / 'model').config.camex
    assert options['dynamic'] is True and options['merge'] == 'euclidean'


@pytest.mark.parametrize('model_type', ['t5', 'gpt2'])
def test_classification_learns_and_saves(tmp_path, model_type):
    train = write_labelled(tmp_path / 'train.csv', 240, seed=0)
    dev = write_labelled(tmp_path / 'dev.csv', 60, seed=1)
    history = train_classification.main([
        '--train-file', str(train), '--validation-file', str(dev), '--model-type', model_type,
        '--config-overrides', T5_TINY if model_type == 't5' else 'n_embd=32,n_layer=2,n_head=2',
        '--num-experts', '4', '--batch-size', '16', '--num-epochs', '4', '--lr', '3e-3', '--log-every', '0',
        '--balance-coef', '0.01', '--output-dir', str(tmp_path / 'out')])
    first, last = history[0], history[-1]
    assert set(last) >= {'accuracy', 'f1', 'matthews_correlation', 'val_loss', 'train_aux_loss'}
    assert last['val_loss'] < first['val_loss'] and last['accuracy'] > 0.75 and last['train_aux_loss'] > 0
    model = from_pretrained(tmp_path / 'out' / 'model')
    assert model.config.camex['segment_length'] is None  # classification routes whole sequences by default


def test_classification_glue_metrics_and_regression(tmp_path):
    train = write_labelled(tmp_path / 'train.csv', 64, seed=0, label_names=('0', '1'), pair=True)
    history = train_classification.main([
        '--task-name', 'MRPC', '--train-file', str(train), '--model-type', 't5', '--config-overrides', T5_TINY,
        '--num-experts', '3', '--batch-size', '16', '--num-epochs', '1', '--log-every', '0',
        '--output-dir', str(tmp_path / 'mrpc')])
    assert {'accuracy', 'f1'} <= set(history[-1]) and 'matthews_correlation' not in history[-1]
    scores = tmp_path / 'scores.jsonl'
    rng = random.Random(0)
    scores.write_text('\n'.join(json.dumps({'sentence1': f'a {i}', 'sentence2': f'b {i % 5}', 'label': rng.random()})
                                for i in range(40)), encoding='utf-8')
    history = train_classification.main([
        '--task-name', 'sts-b', '--train-file', str(scores), '--model-type', 'gpt2', '--config-overrides',
        'n_embd=32,n_layer=1,n_head=2', '--num-experts', '3', '--batch-size', '8', '--num-epochs', '1',
        '--log-every', '0', '--output-dir', str(tmp_path / 'stsb')])
    assert {'pearson', 'spearmanr'} <= set(history[-1])


# ---- bad input ----

def test_clm_rejects_empty_and_non_utf8_text(tmp_path):
    empty = tmp_path / 'empty.txt'
    empty.write_text('')
    with pytest.raises(ValueError, match=f'text file {empty} is empty'):
        train_clm.main(clm_args(tmp_path, empty, '--max-steps', '1'))
    latin1 = tmp_path / 'latin1.txt'
    latin1.write_bytes('Persuasion, by Jane Austen. Anne Elliot\xe9'.encode('latin-1'))
    with pytest.raises(ValueError, match='is not valid UTF-8'):
        train_clm.main(clm_args(tmp_path, latin1, '--max-steps', '1'))
    with pytest.raises(ValueError, match='segment-length=0'):
        train_clm.main(clm_args(tmp_path, write_corpus(tmp_path / 'ok.txt', 50), '--segment-length', '0'))


def test_classification_rejects_labels_outside_the_label_set(tmp_path):
    train = write_labelled(tmp_path / 'train.csv', 20, seed=0)
    dev = write_labelled(tmp_path / 'dev.csv', 20, seed=1, label_names=('negative', 'neutral'))
    with pytest.raises(ValueError, match=r"label 'neutral', which is outside the label set \['negative', 'positive'\]"):
        train_classification.main(['--train-file', str(train), '--validation-file', str(dev),
                                   '--output-dir', str(tmp_path / 'out')])
    with pytest.raises(ValueError, match=r"label 'positive', which is outside the label set \['negative', 'neutral'\]"):
        train_classification.main(['--train-file', str(train), '--labels', 'negative,neutral',
                                   '--output-dir', str(tmp_path / 'out')])


def test_hub_data_needs_the_datasets_package(tmp_path):
    try:
        import datasets  # noqa: F401
        pytest.skip('datasets is installed; reading the Hub would need the network')
    except ImportError:
        pass
    with pytest.raises(ImportError, match="Hub dataset 'wikitext'.*datasets"):
        train_clm.main(['--dataset-name', 'wikitext-2', '--tokenizer', 'byte', '--output-dir', str(tmp_path)])
    with pytest.raises(ImportError, match="GLUE task 'sst2'.*datasets"):
        train_classification.main(['--task-name', 'SST-2', '--output-dir', str(tmp_path)])
