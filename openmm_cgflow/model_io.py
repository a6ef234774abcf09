"""Saving and loading a trained flow together with the molecule it belongs to (``flow.pt``).

One file holds everything backmapping and retraining need, so ``cgflow backmap RUN_DIR ...`` works on
another machine: the flow's constructor arguments and weights, and the :class:`~openmm_cgflow.systems.CGSystem`
(OpenMM System as XML, topology with its bonds, reference positions in nm, temperature in K, CG dihedrals
and chiral centres). Writes are atomic (temporary file + rename), so a crash never leaves half a file.
"""

from __future__ import annotations

import io
import os
import tempfile

import numpy as np
import openmm
import openmm.app as app
import torch

from .flow import ConditionalFlow

__all__ = ["save_model", "load_model", "atomic_torch_save", "system_to_dict", "system_from_dict"]

FORMAT = "openmm-cgflow-model/1"


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` through a temporary file in the same directory and ``os.replace``."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def system_to_dict(cgsystem) -> dict:
    """Plain-data description of a CGSystem (strings, lists, arrays) from which it can be rebuilt."""
    if cgsystem.name == "mueller-brown" and not cgsystem.cg_atoms:
        return {"builtin": "mueller-brown"}
    buf = io.StringIO()
    app.PDBFile.writeFile(cgsystem.topology, cgsystem.positions * 10.0 * openmm.unit.angstrom, buf)
    atom_index = {atom: i for i, atom in enumerate(cgsystem.topology.atoms())}
    bonds = [(atom_index[a], atom_index[b]) for a, b in cgsystem.topology.bonds()]
    return {
        "name": cgsystem.name,
        "system_xml": openmm.XmlSerializer.serialize(cgsystem.system),
        "pdb": buf.getvalue(),
        "bonds": bonds,
        "positions_nm": np.asarray(cgsystem.positions, dtype=np.float64),
        "temperature_K": float(cgsystem.temperature),
        "cg_atoms": [list(map(int, q)) for q in cgsystem.cg_atoms],
        "cg_names": list(cgsystem.cg_names),
        "chiral_centres": [list(map(int, q)) for q in getattr(cgsystem.coordinates, "chiral_centres", [])],
    }


def system_from_dict(d: dict):
    """Inverse of :func:`system_to_dict`."""
    from . import systems

    if "builtin" in d:
        return systems.builtin(d["builtin"])
    system = openmm.XmlSerializer.deserialize(d["system_xml"])
    pdb = app.PDBFile(io.StringIO(d["pdb"]))
    topology = pdb.topology
    atoms = list(topology.atoms())
    topology._bonds = []  # the stored bond list is authoritative (PDB CONECT records are incomplete)
    for i, j in d["bonds"]:
        topology.addBond(atoms[i], atoms[j])
    return systems.from_openmm(
        system, topology, d["positions_nm"], d["temperature_K"], [tuple(q) for q in d["cg_atoms"]],
        name=d["name"], cg_names=d["cg_names"], chiral_centres=[tuple(q) for q in d["chiral_centres"]],
    )


def save_model(path: str | os.PathLike, flow: ConditionalFlow, cgsystem, **extra) -> None:
    """Write the flow (constructor arguments, dtype, weights) and its CGSystem to ``path`` atomically.

    ``extra`` (plain data: numbers, strings, lists, arrays) is stored alongside and returned by
    :func:`load_model` with ``return_extra=True``.
    """
    payload = {
        "format": FORMAT,
        "flow_hparams": dict(flow.hparams),
        "flow_dtype": str(flow.dtype).replace("torch.", ""),
        "flow_state": {k: v.detach().cpu() for k, v in flow.state_dict().items()},
        "system": system_to_dict(cgsystem),
        "extra": extra,
    }
    atomic_torch_save(payload, path)


def load_model(path: str | os.PathLike, return_extra: bool = False):
    """Read a file written by :func:`save_model` -> ``(flow, cgsystem)`` (and ``extra`` if asked).

    Raises FileNotFoundError for a missing file and ValueError (naming the file) for one that is not a
    complete openmm-cgflow model.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "flow.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ValueError(f"could not read model file {path} (corrupt or not a torch file): {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not an openmm-cgflow model file (expected format {FORMAT!r})")
    cgsystem = system_from_dict(payload["system"])
    hp = dict(payload["flow_hparams"])
    flow = ConditionalFlow(dtype=getattr(torch, payload["flow_dtype"]), **hp)
    flow.load_state_dict(payload["flow_state"])
    flow.eval()
    if return_extra:
        return flow, cgsystem, payload.get("extra", {})
    return flow, cgsystem
