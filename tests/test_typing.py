"""mypy over the package (config in pyproject.toml), and the typed public API as a user sees it."""
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mypy")

ROOT = Path(__file__).resolve().parents[1]

USER_CODE = '''
import numpy as np
import torch
from torch import Tensor
from ot_losses import (InfoNCELoss, L2RMLoss, MultiSKLoss, SwAMPLoss, info_nce_loss, l2rm_loss, multi_sk_loss,
                       swamp_loss)
from ot_losses.losses import InfoNCEDetails, L2RMDetails, MultiSKDetails, SwAMPDetails

z, c = torch.randn(8, 4), torch.randn(3, 4)
loss: Tensor = swamp_loss(z, z, c, eps=torch.tensor(0.05), temperature=np.float32(0.1))
loss.backward()
details: SwAMPDetails = swamp_loss(z, z, c, return_details=True)[1]
err: float = details.marginal_error_a
d2: InfoNCEDetails = info_nce_loss(z, z, return_details=True)[1]
per_pair: Tensor = info_nce_loss(z, z, reduction="none")
d3: L2RMDetails = l2rm_loss(z @ z.T, return_details=True)[1]
d4: MultiSKDetails = multi_sk_loss(z, z, k=2, return_details=True)[1]
mods = [SwAMPLoss(4), L2RMLoss(8, mass=0.1), MultiSKLoss(4, n_anchors=6), InfoNCELoss(temperature=0.1)]
'''

BAD_USER_CODE = '''
import torch
from ot_losses import swamp_loss
from ot_losses.losses import SwAMPDetails
z = torch.randn(8, 4)
details: SwAMPDetails = swamp_loss(z, z, z)[1]
'''


def test_mypy_passes_on_the_package_and_on_typed_user_code(tmp_path):
    good, bad = tmp_path / "good.py", tmp_path / "bad.py"
    good.write_text(USER_CODE)
    bad.write_text(BAD_USER_CODE)
    command = [sys.executable, "-m", "mypy", "--no-error-summary", "ot_losses", str(good), str(bad)]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    errors = [line for line in out.stdout.splitlines() if ": error:" in line]
    # the only error: without return_details the result is a Tensor, not a (loss, details) pair
    assert len(errors) == 1, out.stdout + out.stderr
    assert "bad.py:6" in errors[0] and "SwAMPDetails" in errors[0], errors
