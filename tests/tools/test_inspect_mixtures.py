"""tools/inspect_mixtures.py on a checkpoint whose banks were filled as CPM fills them."""
import json
from pathlib import Path

import torch

import cpm_d2  # noqa: F401  (compat fixes + registries)
from cpm_d2.checkpoint import AVSCheckpointer
from cpm_d2.config import setup_cfg
from cpm_d2.engine import Trainer

from _scripts import load_script

inspect_mixtures = load_script("tools/inspect_mixtures.py")
CPM_TINY = Path(__file__).resolve().parents[2] / "configs" / "synthetic" / "cpm_r18_tiny.yaml"


def test_reports_weights_and_that_the_components_split_by_prediction(tmp_path, capsys):
    cfg = setup_cfg(str(CPM_TINY), ["MODEL.MASK_FORMER.GMM.MIN_ENTRIES_PER_COMPONENT", "2",
                                    "MODEL.MASK_FORMER.GMM.MEMORY_SIZE", "256", "OUTPUT_DIR", str(tmp_path)])
    torch.manual_seed(0)
    model = Trainer.build_model(cfg)
    head = model.class_predictor
    P, C, D = 4, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, cfg.MODEL.MASK_FORMER.HIDDEN_DIM
    direction = torch.nn.functional.normalize(torch.randn(P, D), dim=-1)
    for it in range(15):  # class 0, 4 queries a step; prediction p's copy sits near its own direction
        queries = torch.randn(4, D) * 0.05
        emb = torch.cat([queries + 2 * direction[p] for p in [P - 1] + list(range(P - 1))])  # final first
        head.observe(emb, torch.zeros(4 * P, dtype=torch.long), it, torch.arange(4).repeat(P))
    head.update(15)
    weights = tmp_path / "model.pth"
    AVSCheckpointer(model, save_dir=str(tmp_path)).save("model")
    config = tmp_path / "config.yaml"
    config.write_text(cfg.dump())
    out = tmp_path / "mixtures.json"
    inspect_mixtures.main(["--output", str(out), str(config), str(weights)])
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert len(res["classes"]) == C + 1 and res["classes"][-1]["class"] == "no object"
    first = res["classes"][0]
    assert first["bank"] == 15 * 4 * P and first["fitted"] and first["live"] == cfg.MODEL.MASK_FORMER.GMM.NUM_COMPONENTS
    assert not res["classes"][1]["fitted"]
    agree = res["prediction_agreement"]
    assert agree["groups"] == 15 * 4 and agree["classes"] == 1
    # 4 predictions in 3 components: copies of one query mostly land in different components
    assert sum(agree["agreement"]) / 3 < agree["chance"], agree
    # modelled as unit vectors (NORMALIZE): nearly orthogonal directions lie ~sqrt(2) apart
    assert all(abs(d - 2 ** 0.5) < 0.2 for d in agree["distance"]), agree
    assert "same component as final" in printed


def test_reports_whether_the_prompts_take_a_component_of_their_own(tmp_path, capsys):
    """OBSERVE_PROMPTS banks: class 0's query entries sit near one direction and its prompt entries
    (sources from PROMPT_SOURCE) near another, so the prompts' majority component holds none of the
    queries (and at least half of the prompts, which two components may share); class 1's prompts and queries form one cluster far narrower than the
    variance floor, which one component takes whole."""
    from cpm_d2.modeling.class_predictor.mixture import PROMPT_SOURCE

    cfg = setup_cfg(str(CPM_TINY), ["MODEL.MASK_FORMER.GMM.MIN_ENTRIES_PER_COMPONENT", "2",
                                    "MODEL.MASK_FORMER.GMM.OBSERVE_PROMPTS", "True",
                                    "MODEL.MASK_FORMER.GMM.OBSERVE_LAYERS", "last", "OUTPUT_DIR", str(tmp_path)])
    torch.manual_seed(0)
    model = Trainer.build_model(cfg)
    head = model.class_predictor
    D = cfg.MODEL.MASK_FORMER.HIDDEN_DIM
    a, b, c = torch.nn.functional.normalize(torch.randn(3, D), dim=-1)
    for it in range(12):  # 4 queries and 2 prompts a step per class
        emb = torch.cat([a + 0.05 * torch.randn(4, D), b + 0.05 * torch.randn(2, D),
                         c + 1e-4 * torch.randn(6, D)])
        labels = torch.tensor([0] * 6 + [1] * 6)
        sources = torch.tensor([0, 1, 2, 3, PROMPT_SOURCE, PROMPT_SOURCE + 1, 4, 5, 6, 7,
                                PROMPT_SOURCE + 2, PROMPT_SOURCE + 3])
        head.observe(emb, labels, it, sources)
    head.update(12)
    AVSCheckpointer(model, save_dir=str(tmp_path)).save("model")
    config = tmp_path / "config.yaml"
    config.write_text(cfg.dump())
    out = tmp_path / "mixtures.json"
    inspect_mixtures.main(["--output", str(out), str(config), str(tmp_path / "model.pth")])
    split = json.loads(out.read_text())["prompt_components"]
    assert split["classes"] == 2 and split["separated"] == 1
    assert abs(split["prompt_fraction"] - 1 / 3) < 1e-9
    # query share: 0 in class 0, 1 in class 1; prompt share: >= 1/2 in class 0, 1 in class 1
    assert split["query_share"] == 0.5 and split["prompt_share"] >= 0.75
    assert "majority component is not the queries' in 1 classes" in capsys.readouterr().out
