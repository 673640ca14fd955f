"""Golden losses: the first 20 training losses of every objective on a tiny Path-Star run, pinned.

The numbers were produced by nextlat 0.1.0 before the package was split into rooms (commit 008330b;
fd0d8c4, the float64-test fixes, gives the same values), one thread, fp32 on CPU; those of BST and JTP
were produced again when both became the paper's own (issue 17: BST's text head, pairs and loss, JTP's
next-token loss through the fetch module), on the same set-up. Any change to what an
objective, the backbone, the data order or the optimiser computes moves them far more than the
relative tolerance of 1e-4, which is two orders of magnitude above what another CPU's BLAS changes
in 20 steps of this 2-layer model.
"""

from __future__ import annotations

import json

import pytest
from conftest import TINY_RUN

from nextlat.config import with_settings
from nextlat.registry import config_from_dict
from nextlat.training.loop import Trainer

SETTINGS = {"next_token": {}, "next_latent": {"objective.horizon": 2}, "mtp": {"objective.horizon": 2},
            "jtp": {"objective.horizon": 2}, "bst": {}}

GOLDEN = {
    "next_token": [
        3.1698951721191406, 3.179997682571411, 3.11514949798584, 3.1171765327453613,
        3.084063768386841, 3.0586793422698975, 3.037740707397461, 3.0302608013153076,
        3.029160499572754, 3.006695508956909, 3.0044233798980713, 2.999129295349121,
        2.9737906455993652, 2.993744134902954, 2.948240280151367, 2.961717128753662,
        2.9366114139556885, 2.9299933910369873, 2.8995046615600586, 2.912519693374634,
    ],
    "next_latent": [
        3.8121228218078613, 3.7319412231445312, 3.540820598602295, 3.400865316390991,
        3.2730913162231445, 3.1984353065490723, 3.1406912803649902, 3.1000611782073975,
        3.0864808559417725, 3.0752055644989014, 3.0492868423461914, 3.051806688308716,
        3.034982204437256, 3.0301616191864014, 3.011462926864624, 3.0176384449005127,
        3.0004594326019287, 3.000220537185669, 2.990173101425171, 2.991446018218994,
    ],
    "mtp": [
        6.357444763183594, 6.343887805938721, 6.2675371170043945, 6.2403483390808105,
        6.200873851776123, 6.1444010734558105, 6.100314617156982, 6.0828399658203125,
        6.068042755126953, 6.054203510284424, 6.028801918029785, 6.028822898864746,
        5.984282493591309, 6.004290580749512, 5.95505952835083, 5.968348026275635,
        5.91649055480957, 5.920042991638184, 5.891837120056152, 5.9018425941467285,
    ],
    "jtp": [
        6.370785713195801, 6.34234094619751, 6.250812530517578, 6.235342979431152,
        6.165342807769775, 6.115655422210693, 6.085627555847168, 6.085660457611084,
        6.077558994293213, 6.0440497398376465, 6.038015365600586, 6.039134502410889,
        5.988987445831299, 6.016521453857422, 5.964728355407715, 5.976840972900391,
        5.919879913330078, 5.922938346862793, 5.910355567932129, 5.914486885070801,
    ],
    "bst": [
        3.1708693504333496, 3.1857385635375977, 3.144672393798828, 3.153742551803589,
        3.10994291305542, 3.0973894596099854, 3.090060234069824, 3.0845179557800293,
        3.0830366611480713, 3.047628402709961, 3.047966480255127, 3.0448641777038574,
        3.019810676574707, 3.039822578430176, 3.0089993476867676, 3.0038323402404785,
        2.987252950668335, 2.9811782836914062, 2.9655966758728027, 2.969369888305664,
    ],
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_first_twenty_losses_are_pinned(tmp_path, name):
    cfg = config_from_dict(with_settings(TINY_RUN, {"objective.name": name, **SETTINGS[name], "train.steps": 20,
                                                    "train.log_every": 1, "train.threads": 1}))
    Trainer(cfg, out_dir=tmp_path / "run").fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert losses == pytest.approx(GOLDEN[name], rel=1e-4)
