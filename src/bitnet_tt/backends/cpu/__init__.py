"""The fast CPU backend: native 2-bit ternary kernels (csrc/) behind the Backend interface."""
