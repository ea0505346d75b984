"""What the test tiers share: the in-process sidecar, the real process, engine calls, ledger backends,
the oracle that checks figures against their rows, and the servers tests talk to. No test module imports another;
each imports from here."""
