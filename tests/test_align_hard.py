"""Issue 10 on the hard sample brain (`create_pipeline sample --hard`: 24 sections, rotations up
to +-45 degrees, 2 mounted mirrored, 2 torn, 2 with a piece missing), through the command line,
measured against its truth (tests/helpers_truth.py; bench/hard_align.py prints the same in full).

What is asserted is what the stage reaches (docs/processing.md, "Alignment on hard brains"):
--detect-flips names exactly the mirrored sections; every other section is placed better than
unaligned, and <= 1 thumbnail px RMS over them. Not asserted, because it does not hold (printed):
every pair's rotation within 1 degree (measured: the first section's two pairs 3.2-3.4 degrees
off as solved, 21->23 1.01). Mirrored sections are left out of the accuracy: no rigid transform
can place a section mounted face down, and align never mirrors one (it names them)."""

from __future__ import annotations

import json

import pytest

from pipeline.sample import SampleTruth, build_sample
from tests.helpers_truth import alignment_errors, rms, truth_keys
from tests.test_stages_clean_align import cli, last_run

pytestmark = [pytest.mark.filterwarnings("ignore:builtin type [Ss]wig"), pytest.mark.slow]


@pytest.fixture(scope="module")
def hard_processed(tmp_path_factory):
    root = tmp_path_factory.mktemp("hard")
    db_url = f"sqlite:///{root / 'slidepipe.db'}"
    build_sample(root, animal="DEMO", seed=0, size="hard")
    for task in ("extract", "mask", "clean"):
        assert cli(root, db_url, task) == 0, task
    assert cli(root, db_url, "align", "--detect-flips") == 0
    return root, db_url


def test_the_hard_sample_is_aligned_within_a_pixel_and_its_mirrored_sections_are_named(hard_processed):
    root, db_url = hard_processed
    truth = SampleTruth.load(root, "DEMO")
    names = truth_keys(truth)
    errors = alignment_errors(root)
    mirrored = errors["mirrored"]
    named = json.loads(last_run(db_url, "align").summary)["mirror_check"]["looks_mirrored"]
    assert sorted(named) == sorted(names[i] for i in mirrored) and mirrored

    good = [s for s in errors["sections"] if not s["mirrored"]]
    final = rms(s["error_px"] for s in good)
    pairs = [p for p in errors["pairs"] if not p["mirrored"]]
    off = [(p["fixed"], p["moving"], round(p["solved_rotation_error_deg"], 1)) for p in pairs
           if abs(p["solved_rotation_error_deg"]) > 1]
    print(f"hard sample, {len(good)} sections not mirrored: final RMS {final:.2f} px (worst "
          f"{max(s['error_px'] for s in good):.2f}); unaligned {rms(s['unaligned_px'] for s in good):.2f}, chained "
          f"{rms(s['chained_px'] for s in good):.2f}; mirrored sections {mirrored}: "
          + ", ".join(f"{s['error_px']:.1f} px" for s in errors["sections"] if s["mirrored"])
          + f" (--detect-flips named {sorted(names.index(n) for n in named)})"
          + f"; pairs (solved) more than 1 degree off: {len(off)} of {len(pairs)} {off}; registrations more than 1 "
          f"degree off: {sum(abs(p['rotation_error_deg']) > 1 for p in pairs)}")
    assert final <= 1.0
    reference = errors["reference"]
    assert all(s["error_px"] < s["unaligned_px"] for s in good if s["position"] != reference)
