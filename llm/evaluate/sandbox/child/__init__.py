"""The sandbox's inside: run as scripts from /harness (see harness.py), never imported by the evaluator."""
