"""Data-use policies as code: Cedar policies validated against the Concord schema.

``engine`` loads and evaluates a policy set, ``facts`` turns what a study names into Cedar
entities, ``decisions`` holds the decision points of a study's life (submission, site
approval, rounds, release). The consortium server evaluates the consortium's policy set
with them, each site its own set on top (:mod:`site_node.site_policy`).
"""
