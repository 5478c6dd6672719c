"""The demo's steps, one module each, in the order `run.run_demo` takes them."""
