"""Triton kernels with their autograd wrappers. Imports only torch and triton."""
