"""The consortium's data-use policy on the server: published versions, the gates the
studies service calls, and the HTTP routes.

The engine, the facts and the decision points are shared with the sites
(:mod:`concord_protocol.policy`); ``service`` publishes and versions the consortium's set,
``checks`` builds facts from the database and holds the gates, ``router`` the routes.
"""
