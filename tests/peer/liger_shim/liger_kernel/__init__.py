"""A stand-in for Liger-Kernel's DPO entries, backed by robalign, so that Liger's own DPO test suite
(``test/chunked_loss/test_dpo_loss.py`` of its sdist) runs against robalign's fused loss:
``tests/peer/run_liger_suite.sh``. Only what that suite imports is here."""
