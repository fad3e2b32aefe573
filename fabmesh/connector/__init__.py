"""The cloud connector: terminates every edge tunnel and bridges it into flannel."""
