"""Generation tests (issue 9): decoder fixtures, the Decoder, the slot scheduler and the generate API."""
