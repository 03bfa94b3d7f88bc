"""The adversary suite: attacks on a live server (`scripts/adversary.sh`; see suite.py)."""
