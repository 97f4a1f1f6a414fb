"""HTTP edge: dependencies, middleware, and the composition of the domain routers."""
