"""Out-of-tree models with wrong declarations, installed as real `parcap.models` plugins.

`install(root)` writes one module and one `.dist-info` distribution into `root`; a process
with `root` on PYTHONPATH (spawned ranks included) finds both through the entry point.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

MODULE = "parcap_wrong_declarations"
DISTRIBUTION = "parcap-wrong-declarations"
# architecture -> class name in MODULE
CLAIMS_SELF_MANAGED = "ClaimsSelfManagedQwen3Moe"
FORGETS_SELF_MANAGED = "ForgetsSelfManagedDeepseekV3"

SOURCE = '''
"""Two subclasses whose one line of declaration is wrong."""

from models.deepseek_v3 import DeepseekV3ForCausalLM
from models.qwen3_moe import Qwen3MoeForCausalLM
from registry import ParallelCapabilities


class ClaimsSelfManagedQwen3Moe(Qwen3MoeForCausalLM):
    """Reduce-scatters through the engine's communicator, yet claims to shard its tokens."""

    parallel_capabilities = ParallelCapabilities(self_managed_sp=True)


class ForgetsSelfManagedDeepseekV3(DeepseekV3ForCausalLM):
    """Splits its group's tokens itself, yet resets its declaration to the default."""

    parallel_capabilities = ParallelCapabilities()
'''


def install(root: Path) -> dict[str, str]:
    """Write the plugin into `root`; the environment a `parcap` subprocess needs to see it."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{MODULE}.py").write_text(textwrap.dedent(SOURCE))
    info = root / f"{DISTRIBUTION.replace('-', '_')}-1.0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DISTRIBUTION}\nVersion: 1.0\n")
    entries = "".join(
        f"{arch} = {MODULE}:{arch}\n" for arch in (CLAIMS_SELF_MANAGED, FORGETS_SELF_MANAGED)
    )
    (info / "entry_points.txt").write_text(f"[parcap.models]\n{entries}")
    root_dir = Path(__file__).resolve().parents[2]
    return {"PYTHONPATH": os.pathsep.join([str(root), str(root_dir)])}
