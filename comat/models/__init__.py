"""One model layer for hub ids, local directories and the toy zoo."""
