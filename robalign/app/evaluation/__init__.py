"""robalign.app.evaluation — how good is the trained policy.

    accuracy.py     ``robalign eval``: the implicit reward's preference accuracy on a file
    samples.py      what the policy writes: sampling, gold-reward win rates, KL from samples, bootstrap
                    intervals
"""
