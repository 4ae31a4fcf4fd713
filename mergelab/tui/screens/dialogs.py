"""Modal dialogs shared by the app's screens: a one-line input (a directory, a repo id), a choice
among buttons (quit, delete), and a directory / file picker (the new-search form)."""
from __future__ import annotations

from pathlib import Path

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label


class InputDialog(ModalScreen[str | None]):
    """Asks for one value; dismisses with the text (Enter / OK) or None (Escape / Cancel)."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, prompt: str, value: str = "", placeholder: str = "") -> None:
        super().__init__()
        self.title_text, self.prompt, self.value, self.placeholder = title, prompt, value, placeholder

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.title_text, classes="dialog-title")
            yield Label(self.prompt)
            yield Input(value=self.value, placeholder=self.placeholder, id="dialog-input")
            with Horizontal(classes="dialog-buttons"):
                yield Button("OK", variant="primary", id="ok")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.query_one(Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self._submit()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "ok":
            self._submit()
        else:
            self.dismiss(None)

    def _submit(self) -> None:
        text = self.query_one(Input).value.strip()
        self.dismiss(text or None)

    def action_cancel(self) -> None:
        self.dismiss(None)


class ChoiceDialog(ModalScreen[str | None]):
    """A question with one button per choice; dismisses with the choice's id (None on Escape)."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, text: str, choices: list[tuple[str, str]]) -> None:
        super().__init__()
        self.title_text, self.text, self.choices = title, text, choices

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.title_text, classes="dialog-title")
            yield Label(self.text)
            with Horizontal(classes="dialog-buttons"):
                for i, (cid, label) in enumerate(self.choices):
                    yield Button(label, id=cid, variant="primary" if i == 0 else "default")

    def on_mount(self) -> None:
        self.query(Button).first().focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.dismiss(event.button.id)

    def action_cancel(self) -> None:
        self.dismiss(None)


class PathPicker(ModalScreen[str | None]):
    """Pick a directory (a model) or a file (an eval spec) with Textual's DirectoryTree.

    Enter opens a folder (or picks a file in file mode), c chooses the highlighted entry,
    backspace goes to the parent folder, Escape cancels."""

    BINDINGS = [
        Binding("c", "choose", "Choose highlighted"),
        Binding("backspace", "parent", "Parent folder"),
        Binding("escape", "cancel", "Cancel"),
    ]

    def __init__(self, title: str, start: str | Path = ".", *, files: bool = False) -> None:
        super().__init__()
        self.title_text, self.files = title, files
        start = Path(start).expanduser()
        if start.is_file():
            start = start.parent
        while not start.is_dir() and start != start.parent:
            start = start.parent  # a half-typed path: start from the nearest existing folder
        self.start = start.resolve()
        self.highlighted: Path | None = None

    def compose(self) -> ComposeResult:
        from textual.widgets import DirectoryTree, Footer

        with Vertical(classes="dialog picker"):
            yield Label(self.title_text, classes="dialog-title")
            yield Label(str(self.start), id="picker-path")
            yield DirectoryTree(self.start, id="picker-tree")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Choose", variant="primary", id="choose")
                yield Button("Cancel", id="cancel")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#picker-tree").focus()

    def on_tree_node_highlighted(self, event) -> None:
        data = getattr(event.node, "data", None)
        path = getattr(data, "path", None)
        if path is not None:
            self.highlighted = Path(path)
            self.query_one("#picker-path", Label).update(str(path))

    def on_directory_tree_file_selected(self, event) -> None:
        event.stop()
        if self.files:
            self.dismiss(str(event.path))

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "choose":
            self.action_choose()
        else:
            self.dismiss(None)

    def action_choose(self) -> None:
        path = self.highlighted or self.start
        if self.files and not path.is_file():
            self.notify("highlight a file (an eval spec YAML) to choose it", severity="warning")
            return
        if not self.files and not path.is_dir():
            path = path.parent
        self.dismiss(str(path))

    def action_parent(self) -> None:
        from textual.widgets import DirectoryTree

        tree = self.query_one("#picker-tree", DirectoryTree)
        parent = Path(tree.path).resolve().parent
        tree.path = parent
        self.start = parent
        self.highlighted = None
        self.query_one("#picker-path", Label).update(str(parent))

    def action_cancel(self) -> None:
        self.dismiss(None)
