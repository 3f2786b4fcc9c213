"""hardware: device profiles (one TOML per device), the loader/validator, the local probe and the roofline."""

from hardware.profile import Profile, ProfileError, load_profile, load_profile_file, profile_names

__all__ = ["Profile", "ProfileError", "load_profile", "load_profile_file", "profile_names"]
