"""The randomized fault harness ("chaos"): its driver, faults, run log, invariant checks and reports, and the
room ledger scenario. The tests are in test_chaos.py (the seeds), test_checks.py (the checks on made-up histories)."""
