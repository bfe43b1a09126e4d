"""Model cards: one per registered architecture, in the Hub's format, with current measured figures."""
import re
from pathlib import Path

import pytest
import yaml

import timm
from camex_vision.models import cards

REPO_ROOT = Path(__file__).resolve().parents[1]
ALL_MODELS = timm.list_models('*camex*')


def test_cards_and_table_are_present_and_current():
    """Fails when a card is missing or its figures are stale: run `python -m camex_vision.models.cards`."""
    stale = cards.stale_files(REPO_ROOT)
    assert stale == [], f'regenerate with `python -m camex_vision.models.cards`: {[str(p) for p in stale]}'


@pytest.mark.parametrize('model_name', ALL_MODELS)
def test_card_follows_the_hub_format(model_name):
    text = (REPO_ROOT / 'model_cards' / f'{model_name}.md').read_text(encoding='utf-8')
    front, body = re.match(r'^---\n(.*?)\n---\n(.*)$', text, re.S).groups()
    meta = yaml.safe_load(front)
    assert meta['library_name'] == 'timm' and meta['license'] and {'timm', 'image-classification'} <= set(meta['tags'])
    cfg = timm.models.get_pretrained_cfg(model_name)
    if cfg.hf_hub_id:
        assert meta['datasets'] and meta['base_model'] == cfg.hf_hub_id
    assert '## Model Details' in body and 'Params (M):' in body and 'GMACs:' in body and 'Activations (M):' in body
    usages = re.findall(r'```python\n(.*?)```', body, re.S)
    assert usages and all(u.startswith('import camex_vision') for u in usages)
    citations = re.findall(r'```bibtex\n(.*?)```', body, re.S)
    assert any('CAMEx: Curvature-aware Merging of Experts' in c for c in citations)
    origin = 'Swin Transformer: Hierarchical' if 'swin' in model_name else 'An Image is Worth 16x16 Words'
    assert any(origin in c for c in citations)


def test_stale_figures_are_detected(tmp_path):
    """The check compares against fresh measurements: an edited figure makes the card stale."""
    (tmp_path / 'docs').mkdir()
    (tmp_path / 'docs' / 'models.md').write_text(f'intro\n{cards.TABLE_BEGIN}\n{cards.TABLE_END}\n')
    cards.write_files(tmp_path)
    assert cards.stale_files(tmp_path) == []
    card = tmp_path / 'model_cards' / 'test_camex_vit.md'
    card.write_text(re.sub(r'Params \(M\): [\d.]+', 'Params (M): 1.00', card.read_text()))
    (tmp_path / 'model_cards' / 'test_camex_swin.md').unlink()
    assert set(cards.stale_files(tmp_path)) == {card, tmp_path / 'model_cards' / 'test_camex_swin.md'}
    assert (tmp_path / 'docs' / 'models.md').read_text().startswith('intro\n')
