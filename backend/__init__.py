"""Reference backend: validation codes, verification certificates, key publish and
signed export files (shapes of the public Exposure Notifications verification and key
servers), plus a small web page for physicians."""
