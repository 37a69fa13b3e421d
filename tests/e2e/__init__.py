"""End-to-end tests: real queue nodes (`taskscheduler queue` processes), their managers and workers, real signals
and a real server. Their job code lives in the job modules of tests/ (sample_jobs, crash_jobs, fencing_jobs).
"""
