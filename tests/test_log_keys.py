"""The log keys have one owner, which the comparison report reads without loading transformers."""

from __future__ import annotations

import subprocess
import sys


def test_the_report_reads_the_callbacks_keys_without_importing_transformers():
    # The callback module imports transformers and torch; the report, which reads what the callback logs,
    # takes the keys from their own module and stays quick to import.
    probe = ("import sys; from dualadam_hf.experiments import checkpoints, report; "
             "print(report.INVERSE_SHARE_KEY, 'transformers' in sys.modules)")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    from dualadam_hf.integrations.callbacks import INVERSE_SHARE_LOG_KEY

    assert loaded.split() == [INVERSE_SHARE_LOG_KEY, "False"]
