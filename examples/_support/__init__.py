"""What the examples share and none of them is about: throwaway servers (``servers``), a web
app served on a thread (``serving``), child processes that can import ``examples``
(``processes``), scripted faults for the fake services (``faults``) and settings read from the
environment (``env``). Each example's README says which of these it uses and why."""
