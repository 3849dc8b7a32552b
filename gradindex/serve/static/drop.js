// dropping a file anywhere on the dashed box puts it in the file input
const drop = document.getElementById("drop"), input = document.getElementById("image");
drop.addEventListener("dragover", e => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", e => {
  e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files.length) input.files = e.dataTransfer.files;
});
