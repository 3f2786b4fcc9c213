"""The CI performance gate (`dsv3 gate`): a results document (or pytest-benchmark JSON) against a recorded baseline.

`rules` says per metric how it is compared (exactly, within a tolerance, statistically, or shown only) and which
extra keys identify a record; `sources` reads the documents and names their machine; `stats` is the Mann-Whitney U
test with a minimum effect size; `compare` pairs records by key and gives each a verdict. docs/gate.md has the
rules, the key, the statistics and the commands.
"""
