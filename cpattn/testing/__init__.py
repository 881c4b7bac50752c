"""Test helpers shipped with cpattn (real gloo ranks on one machine)."""
