"""Development tooling shared by the tests and the benchmarks; not part of the product (the
`dockyard` package never imports it, and it is not installed with it)."""
